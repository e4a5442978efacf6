"""Errors a user can act on. The CLI prints their message and exits non-zero, no traceback."""


class LipmarginError(Exception):
    """Base class of every error lipmargin raises on purpose."""


class DataError(LipmarginError):
    """A dataset file is missing, truncated or corrupt."""


class UnsupportedOperationError(LipmarginError):
    """The Lipschitz bound has no rule for an operation (it is never assumed 1-Lipschitz)."""


class CheckpointError(LipmarginError):
    """A checkpoint is missing, corrupt or does not match the model."""


class RunFolderError(LipmarginError):
    """A run folder cannot be used as asked: an existing run without --resume or --overwrite,
    --resume without a checkpoint, or a resumed config that changes what the checkpoint holds."""


class ConfigError(LipmarginError):
    """A configuration value is invalid."""


class InputError(LipmarginError):
    """Bad input to a public function: wrong shape, NaN, wrong dtype."""


class CertificationError(LipmarginError):
    """A soundness check failed: the traced graph does not compute what the model computes, the
    model is not deterministic, or an input-gradient norm exceeds the bound. No certificate is
    returned."""
