

def test_patch_benchmark_runs_tiny(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "oar.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "oar_patches.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["loader_one_worker"]["patches_per_s"] > 0 and result["step"]["median_step_s"] > 0
    assert result["dynunet_big_patch"]["patch"] == [16, 16, 16]
