"""``rsna-infer`` with the fake families of predict_fakes.py, as a real process that tests can
hurt from outside (signals, resource limits). Usage: ``python tests/fake_cli.py predict ...``
with ``tests/`` on ``PYTHONPATH``.

The module is also a ``predict`` command (``add_arguments`` / ``run_cli``): the real one with
no stage-1 finalize (the fakes need none), through its public ``finalize`` argument. The
process points ``rsna_infer.cli.COMMANDS["predict"]`` at it; in-process tests do the same
with `predict_fakes.use_fake_cli`.
"""

import sys

from rsna_infer.commands import predict as command

add_arguments = command.add_arguments


def run_cli(args) -> int:
    """``rsna-infer predict`` keeping the fakes' keypoints as they are."""
    return command.run_cli(args, finalize=lambda study, kp: kp)


if __name__ == "__main__":
    import predict_fakes

    from rsna_infer import cli
    from rsna_infer.models import registry

    for name, path in predict_fakes.FAKE_PATHS.items():
        registry.register_family(name, path)
    cli.COMMANDS["predict"] = (__name__, cli.COMMANDS["predict"][1])
    sys.exit(cli.main(sys.argv[1:]))
