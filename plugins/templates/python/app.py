"""{{name}}: a sluice plugin. Adds a `greeting` field to every JSON object it receives.

Config (the stage's `config:`): {"greeting": "hello"}, optional. build.sh turns this module
into a component with componentize-py; `Transform` implements the world's `transform` export.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import BatchResult, ErrorKind, OutputRecord, RecordError

greeting = "hello"


class Transform(exports.Transform):
    def init(self, config: str) -> None:
        global greeting
        settings = json.loads(config or "{}") or {}
        if not isinstance(settings, dict):
            raise Err("config: expected an object")
        greeting = settings.get("greeting", "hello")
        if not isinstance(greeting, str):
            raise Err("config: `greeting` must be a string")

    def process(self, batch):
        outputs, errors = [], []
        for i, record in enumerate(batch):
            try:
                row = json.loads(record.value.decode("utf-8"))
            except ValueError as e:
                errors.append(RecordError(i, ErrorKind.PARSE, f"payload is not JSON: {e}"))
                continue
            if not isinstance(row, dict):
                errors.append(RecordError(i, ErrorKind.SCHEMA, "payload is not a JSON object"))
                continue
            row["greeting"] = f"{greeting} from {{name}}"
            outputs.append(OutputRecord(i, None, None, json.dumps(row).encode(), []))
        return BatchResult(outputs, errors)
