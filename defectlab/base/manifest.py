"""Output folders of the generating stages (``sample``, ``synthesize``): files in MVTec AD layout,
one ``manifest.jsonl`` line per finished image, resumable.

Each process appends one line per finished image to ``.manifest-part-<rank>.jsonl`` after the
image is written (a kill loses at most the batch in flight); ``finish`` merges the parts into a
sorted ``manifest.jsonl``. A folder is reused only by a call whose pixel-deciding settings agree
with the ones saved there (``check_reuse``), so a resumed call never mixes two configurations.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import runs
from .errors import DefectlabError

MANIFEST = "manifest.jsonl"
_PARTS = ".manifest-part-*.jsonl"


def read_records(out: Path, needs: tuple[str, ...] = ("file",)) -> dict[tuple[str, int], dict]:
    """Finished items ``{(class, index): record}``: the manifest and the parts of an interrupted
    call, counting a record only when every file it names under ``needs`` exists."""
    out, done = Path(out), {}
    for path in [out / MANIFEST, *sorted(out.glob(_PARTS))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if all(rec.get(key) and (out / rec[key]).is_file() for key in needs):
                done[(rec["class"], rec["index"])] = rec
    return done


def append(out: Path, records: list[dict], rank: int = 0) -> None:
    """One write per batch, after its files: a kill loses at most this batch."""
    if records:
        with open(Path(out) / f".manifest-part-{rank}.jsonl", "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def finish(out: Path, needs: tuple[str, ...] = ("file",)) -> list[dict]:
    """Merge everything finished into a sorted ``manifest.jsonl`` (atomically), drop the parts."""
    out = Path(out)
    records = sorted(read_records(out, needs).values(), key=lambda r: (r["class"], r["index"]))
    runs.write_text(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in records))
    for part in out.glob(_PARTS):
        part.unlink(missing_ok=True)
    return records


def check_reuse(out: Path, config_file: str, resolved: dict, fields: tuple[str, ...],
                legacy: dict | None = None) -> None:
    """An out folder that is not empty must hold ``config_file`` with the same ``fields``;
    ``legacy`` fills fields that folders written before them lack."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / config_file).is_file():
        raise DefectlabError(f"out folder {out} is not empty and holds no {config_file}: choose another --out")
    old = {**(legacy or {}), **runs.read_json(out / config_file)}
    diff = [f"{k}: {old.get(k)!r} ≠ {resolved[k]!r}" for k in fields if old.get(k) != resolved[k]]
    if diff:
        raise DefectlabError(f"out folder {out} holds outputs of another configuration "
                             f"({'; '.join(diff)}): choose another --out")
