"""Generation task streams declared in a YAML or JSON file: the user's own tasks through
``sharecl compare --stream my-tasks.yaml`` (and ``run``), tuned and scored like gen5.

The format::

    name: my-tasks               # default: the file's stem
    kind: generation             # optional: a file whose tasks have `data` is a generation stream
    seed: 0                      # draws the splits of tasks without test/validation files
    max_length: 256              # tokens per example (prompt + answer); default 256
    tasks:                       # in learning order
      - name: tickets
        data: tickets.jsonl      # CSV / JSONL / JSON with prompt + completion, or chat `messages`,
                                 # or a `datasets` save_to_disk directory
        metric: exact-match      # or rouge-l (default)
        max_new_tokens: 16       # default 32
        test: tickets-test.jsonl         # optional; else `test_size` pairs are held out
        validation: tickets-val.jsonl    # optional; else `val_size` pairs are held out
        test_size: 50            # default: 20 % of the distinct prompts
        val_size: 50             # default: as many as the test split
        train_size: 400          # optional cap on training pairs
        prompt_column: prompt    # column names, when they differ
        completion_column: completion

Relative paths are read from the stream file's directory. Held-out splits come from
:func:`sharecl.generation.tasks.split_pairs` (seeded by the stream's seed and the task name);
a prompt that a test or validation file holds is dropped from training, so no split shares a
prompt. ``compare --seeds`` redraws the held-out splits; given files stay as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from sharecl.data.tasks import Stream
from sharecl.generation.tasks import GenerationTask, read_pairs, split_pairs

__all__ = ["read_stream_spec", "is_generation_spec", "load_generation_stream"]

_STREAM_KEYS = {"name", "kind", "seed", "max_length", "tasks"}
_TASK_KEYS = {"name", "data", "metric", "max_new_tokens", "test", "validation", "test_size", "val_size", "train_size",
              "prompt_column", "completion_column"}


def read_stream_spec(path: str | Path) -> dict:
    """The mapping a ``.yaml``/``.yml``/``.json`` stream file holds.

    Raises:
        FileNotFoundError: for a missing file; ValueError: for one that is not a mapping or does not parse.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"stream file {p} does not exist")
    try:
        spec = yaml.safe_load(p.read_text()) if p.suffix.lower() in (".yaml", ".yml") else json.loads(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p} does not parse as {'YAML' if p.suffix.lower() != '.json' else 'JSON'}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"{p} must hold a mapping (name, tasks, …), got {type(spec).__name__}")
    return spec


def is_generation_spec(spec: dict) -> bool:
    """Whether a stream file declares generation tasks (``kind: generation``, or tasks with ``data``)."""
    tasks = spec.get("tasks")
    return spec.get("kind") == "generation" or (isinstance(tasks, list) and bool(tasks)
                                                 and all(isinstance(t, dict) and "data" in t for t in tasks))


def _path(base: Path, value) -> Path:
    p = Path(str(value))
    return p if p.is_absolute() else base / p


def load_generation_stream(path: str | Path, *, seed: int | None = None) -> Stream:
    """A task-incremental generation stream from a stream file (see the module docstring).

    Args:
        path: the ``.yaml``/``.yml``/``.json`` file.
        seed: replaces the file's ``seed`` (``compare --seeds``).

    Raises:
        ValueError: unknown keys, a task without ``name`` or ``data``, an unknown metric, too few
            pairs for the splits asked for; GenerationDataError: an unreadable data file.
    """
    p = Path(path)
    spec = read_stream_spec(p)
    unknown = sorted(set(spec) - _STREAM_KEYS)
    if unknown:
        raise ValueError(f"{p}: unknown keys {unknown}; a generation stream file knows {sorted(_STREAM_KEYS)}")
    if spec.get("kind", "generation") != "generation":
        raise ValueError(f"{p}: kind must be 'generation' for a stream of prompt/completion tasks, got {spec['kind']!r}")
    entries = spec.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{p}: `tasks` must be a non-empty list of tasks, each with a name and data")
    s = int(spec.get("seed", 0) if seed is None else seed)
    tasks = [_task(p, i, entry, s) for i, entry in enumerate(entries)]
    return Stream(str(spec.get("name", p.stem)), tasks, s, "til", modality="lm", max_length=int(spec.get("max_length", 256)))


def _task(p: Path, i: int, entry, seed: int) -> GenerationTask:
    where = f"{p}: task {i + 1}"
    if not isinstance(entry, dict) or "name" not in entry or "data" not in entry:
        raise ValueError(f"{where} needs at least `name` and `data`, got {entry!r:.120}")
    unknown = sorted(set(entry) - _TASK_KEYS)
    if unknown:
        raise ValueError(f"{where} ({entry['name']}): unknown keys {unknown}; known: {sorted(_TASK_KEYS)}")
    name = str(entry["name"])
    cols = {k: entry[k] for k in ("prompt_column", "completion_column") if k in entry}
    data = _path(p.parent, entry["data"])
    pairs = read_pairs(data, **cols)
    given = {split: read_pairs(_path(p.parent, entry[split]), **cols) for split in ("test", "validation") if split in entry}
    held = {q for split in given.values() for q, _ in split}
    dropped = sum(1 for q, _ in pairs if q in held)
    pairs = [(q, a) for q, a in pairs if q not in held]
    n = len({q for q, _ in pairs})
    test_size = entry.get("test_size")
    if "test" in given:
        test_size = 0
    elif test_size is None:
        test_size = max(1, round(0.2 * n))
    val_size = entry.get("val_size")
    if "validation" in given:
        val_size = 0
    elif val_size is None:
        val_size = len(given["test"]) if "test" in given else test_size
    if test_size + val_size >= n:
        raise ValueError(f"{where} ({name}): {n} distinct prompts in {data} leave none for training after {test_size} test "
                         f"and {val_size} validation pairs; lower test_size / val_size or add data")
    meta = {"source": str(data), **({"test_file": str(_path(p.parent, entry["test"]))} if "test" in given else {}),
            **({"validation_file": str(_path(p.parent, entry["validation"]))} if "validation" in given else {}),
            **({"dropped_shared_prompts": dropped} if dropped else {})}
    task = split_pairs(name, pairs, seed=seed, train_size=entry.get("train_size"), test_size=test_size, val_size=val_size,
                       metric=str(entry.get("metric", "rouge-l")), max_new_tokens=int(entry.get("max_new_tokens", 32)), meta=meta)
    if given:
        task.test_inputs = given.get("test", task.test_inputs)
        task.val_inputs = given.get("validation", task.val_inputs)
        task.meta.update(test_size=len(task.test_inputs), val_size=len(task.val_inputs))
    return task
