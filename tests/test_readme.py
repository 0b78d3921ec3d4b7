"""The README's commands and code examples stay true."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_readme_opens_with_train_and_test_commands():
    head = _readme().split("\n---\n")[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", head, re.S)
    assert len(blocks) == 2
    train, test = blocks
    assert "pip install torch==2.13.0" in train and "seqpar train configs/tiny-cpu.yaml --nproc 2" in train
    assert "pip install torch==2.13.0" in test and "python -m pytest" in test
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "test-command" in f.read()


def test_readme_python_examples_run(tmp_path):
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)\n```", _readme(), re.S)
    for block in blocks:
        if block.startswith("# sp_example.py"):
            script = tmp_path / "sp_example.py"
            script.write_text(block)
            for world in (2, 4):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(script)]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
                assert p.returncode == 0, p.stderr[-3000:]
                assert "ring, ulysses and hybrid match single-device attention" in p.stdout
        elif block.startswith("# megatron_example.py"):
            script = tmp_path / "megatron_example.py"
            script.write_text(block)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert p.returncode == 0, p.stderr[-3000:]
            assert "megatron-core GPTModel with seqpar's Ulysses attention at cp=2: loss " in p.stdout
        else:
            exec(compile(block, "README.md", "exec"), {})
    assert any(b.startswith("# sp_example.py") for b in blocks)
    assert any(b.startswith("# megatron_example.py") for b in blocks)
