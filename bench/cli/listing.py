"""`bench list tasks|editors|models`: what is registered, what each editor changes, whether each
task's data is found and whether each model preset is cached. None of them imports torch: a
built-in editor is described by editors.BUILTIN_INFO, not imported."""

from __future__ import annotations

import argparse

from bench.cli.common import DATA_DIR_HELP
from bench.core.errors import BenchError
from bench.core.presets import find_preset, list_presets, preset_cached
from editors import available_editors, describe_editor, presets
from tasks.registry import get_card, list_cards, resolve_data_dir, task_status


def register(sub) -> None:
    p = sub.add_parser("list", help="list tasks, editors or model presets")
    p.add_argument("what", choices=["tasks", "editors", "models"])
    p.add_argument("--data-dir", default=None, help=f"list tasks: {DATA_DIR_HELP}")
    p.set_defaults(func=main)


def list_editors() -> None:
    """One line per editor: name, origin, what its edits change (kinds: weights, modules,
    context), its flags and summary; then the presets shipped for it."""
    print(f"{'editor':14s} {'origin':10s} {'changes':16s} {'flags':24s} summary")
    for name, origin in sorted(available_editors().items()):
        try:
            info = describe_editor(name)
        except BenchError as exc:
            print(f"{name:14s} {origin:10s} (cannot load: {exc})")
            continue
        flags = ", ".join(f for f, on in (("learns", info.learns), ("instructions", info.instructions),
                                          ("train split", info.train_split)) if on)
        kinds = "+".join(info.kinds) or "nothing"
        print(f"{name:14s} {origin:10s} {kinds:16s} {flags or '-':24s} {info.summary}")
        shipped = presets(name)
        if shipped:
            print(f"{'':14s} presets (--hparams-file NAME): {', '.join(shipped)}")


def list_tasks(data_dir_arg: str | None) -> None:
    data_dir, _ = resolve_data_dir(data_dir_arg)
    none = "none found (cached published data, else the built-in sample: bench data list)"
    print(f"data directory: {data_dir if data_dir else none}")
    print(f"{'task':16s} {'data':8s} {'train':>7s} {'eval':>7s} {'skipped':>8s} {'seen':>5s} "
          f"{'unseen':>6s}  source")
    for name in list_cards():
        st = task_status(name, data_dir)
        counts = st.get("counts", {})
        skipped = sum(v or 0 for v in (st.get("skipped") or {}).values())
        instr = st.get("instructions", {})
        source = ", ".join(str(v) for v in st.get("source") or [])
        cells = ["-" if counts.get(s) is None else str(counts.get(s)) for s in ("train", "eval")]
        print(f"{name:16s} {'found' if st['found'] else 'MISSING':8s} {cells[0]:>7s} {cells[1]:>7s} "
              f"{skipped:>8d} {instr.get('seen', 0):>5d} {instr.get('unseen', 0):>6d}  {source}")
        options = get_card(name).options
        if options:
            print(f"{'':16s} options (--task-option {name}.KEY=VALUE): "
                  + ", ".join(f"{k}={v}" for k, v in options.items()))
        for key in ("missing", "error"):
            if st.get(key):
                print(f"{'':16s} {key}: {st[key]}")


def list_models() -> None:
    """One line per model preset, then its editor defaults; a malformed file is shown in its
    place and, once every preset is listed, is an error (exit 2) naming the malformed ones."""
    print(f"{'preset':16s} {'cached':7s} {'kind':5s} {'layers':>6s} {'hidden':>6s} {'vocab':>7s}  description")
    malformed = []
    for name in list_presets():
        try:
            preset = find_preset(name)
        except BenchError as exc:
            print(f"{name:16s} (malformed: {exc})")
            malformed.append(name)
            continue
        e = preset.expect
        print(f"{name:16s} {'yes' if preset_cached(preset) else 'no':7s} "
              f"{'chat' if preset.chat else 'base':5s} {e.layers:>6d} {e.hidden:>6d} {e.vocab:>7d}  "
              f"{preset.description}")
        if preset.editors:
            print(f"{'':16s} editor defaults: " + "; ".join(
                f"{ed} " + ", ".join(f"{k}={v}" for k, v in hp.items()) for ed, hp in preset.editors.items()))
    print("other --model specs: a local checkpoint directory, a .gguf file, a hub id (owner/name)")
    if malformed:
        raise BenchError(f"malformed model preset file(s): {', '.join(malformed)} (see above)")


def main(args: argparse.Namespace) -> int:
    if args.data_dir is not None and args.what != "tasks":  # never silently ignored
        raise BenchError(f"--data-dir applies to `bench list tasks` only, not to `bench list {args.what}`")
    if args.what == "editors":
        list_editors()
    elif args.what == "models":
        list_models()
    else:
        list_tasks(args.data_dir)
    return 0
