"""The README's library example runs as written (against the test broker)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from tests.conftest import BrokerAddress

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_use_it_example_runs(broker: BrokerAddress, topic_name: str) -> None:
    code = re.search(r"## Use it\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "the README lost its 'Use it' example"
    source = code.group(1).replace(
        'KafkaConfig(bootstrap_servers="localhost:9092")',
        f'KafkaConfig(bootstrap_servers="{broker.bootstrap_servers}", topic="{topic_name}")',
    )
    assert broker.bootstrap_servers in source
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the example calls asyncio.run itself
        exec(compile(source, str(README), "exec"), {"__name__": "__main__"})
    assert "state='merged'" in out.getvalue()  # the change it waited for
