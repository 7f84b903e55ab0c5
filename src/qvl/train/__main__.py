"""``python -m qvl.train [CONFIG.yaml] --model_name_or_path ... --dataset_use ... [--key value ...]``.

The official ``qwen-vl-finetune`` flag form, so an ``sft_*.sh`` script ports by swapping the entry
point: ``torchrun --nproc_per_node=N -m qvl.train --model_name_or_path ... --dataset_use ...``.
``key=value`` words and a YAML config file work here too; ``nproc=N`` re-launches the command
under torchrun with N processes on this machine.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from qvl.errors import QvlError
    from qvl.utils.compile_cache import keep_compiled_code
    from qvl.utils.library_warnings import quiet_library_noise

    quiet_library_noise()  # as `qvl train` does: library notices the user cannot act on stay off the output
    keep_compiled_code()  # and compiled code kept between runs
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nEvery key: see docs/train.md (or `qvl train --help`).")
        return 0
    try:
        from qvl.train import distributed
        from qvl.train.config import from_argv

        cfg = from_argv(argv)
        if distributed.needs_launch(cfg):  # nproc=N: the same command under torchrun
            distributed.relaunch(argv, cfg.nproc)
        from qvl.train.loop import train

        finished, owned = False, distributed.owns_process()
        try:
            train(cfg)
            finished = True
        finally:
            distributed.end_group(finished, exit_after=owned)
    except QvlError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
