"""The Python examples in README.md run as written.

```python blocks run; ```py blocks need files a reader downloads (official checkpoints), so they
are only compiled."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["out"].tokens.shape == (2, 1 + 51, 128)  # 512 - round(0.9 * 512) = 51 visible
    assert sum(p.numel() for p in namespace["big"].parameters()) == 308_929_280


def test_readme_download_blocks_compile():
    blocks = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```py block"
    for code in blocks:
        compile(code, str(README), "exec")
