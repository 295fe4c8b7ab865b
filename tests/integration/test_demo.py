"""`recstream demo` on its embedded default, the tansu broker (no JVM, no server to
start), and on Apache Kafka (`--broker kafka`, the launcher the tests use)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("broker", ["tansu", "kafka"])
def test_the_demo_streams_recommendations(tmp_path: Path, broker: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream_worker.cli", "demo", "--events", "400", "--rate", "400",
         "--epochs", "2", "--show", "3", "--workdir", str(tmp_path / "demo"),
         "--broker", broker],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"{broker} broker up at 127.0.0.1:" in out
    # Recommendations printed as they stream out: "user -> item, item, ... (N ms)".
    assert len(re.findall(r"-> \S+.* \(\d+ ms\)", out)) >= 3, out
    summary = re.search(
        r"summary: 400 events .* (\d+) recommendations for (\d+) users.* (\d+) dead letters", out
    )
    assert summary is not None, out
    recommendations, users, dead_letters = map(int, summary.groups())
    assert users > 0 and recommendations >= users
    assert dead_letters == 3  # the demo's three malformed records
    # The running online HR@10: each user's next click against its last list. At 400
    # events/s batches are small, so users click again after their first list.
    online = re.search(r"online HR@10 of (\S+): ([0-9.]+)", out)
    assert online is not None, out
    assert 0 <= float(online.group(2)) <= 1
    # ... and drawn over time.
    assert (tmp_path / "demo" / "online_hr10.png").read_bytes().startswith(b"\x89PNG")
