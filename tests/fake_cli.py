"""``rsna-infer`` with the fake families of predict_fakes.py, as a real process that tests can
hurt from outside (signals, resource limits). Usage: ``python tests/fake_cli.py predict ...``
with ``tests/`` on ``PYTHONPATH``."""

import sys

import predict_fakes

from rsna_infer.models import registry

for name, path in predict_fakes.FAKE_PATHS.items():
    registry.register_family(name, path)

import rsna_infer.inference.engine as predictor  # noqa: E402

predictor._default_finalize = lambda: (lambda study, kp: kp)  # the fakes need no stage-1 finalize

if __name__ == "__main__":
    from rsna_infer.cli import main

    sys.exit(main(sys.argv[1:]))
