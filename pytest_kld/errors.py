"""Errors of pytest-kld. Each carries one line for the user: what was wrong, where, what to do."""


class KldError(Exception):
    """Base class: a problem the user can act on (bad input, stale cache, missing model...)."""


class ModelError(KldError):
    """A model path or hub id that cannot be resolved, loaded or compared."""


class CacheError(KldError):
    """A reference cache that is missing, stale, corrupt or cannot be written."""


class CorpusError(KldError):
    """A corpus (prompt set, dataset file, WikiText-2) that cannot be read or tokenised."""


class TokenizerMismatch(ModelError):
    """The comparison model's tokenizer is not the reference's."""


class ThresholdError(KldError):
    """A nonsensical threshold or unknown keyword given to assert_kld."""
