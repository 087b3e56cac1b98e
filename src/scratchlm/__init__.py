"""scratchlm: raw text to a language model you trained yourself.

The subpackages follow the pipeline, each depending only on the ones before it:
tokenizer -> data -> model -> train -> eval -> infer -> post -> export.
"""

__version__ = "0.1.0"

from scratchlm.errors import ScratchLMError

__all__ = ["ScratchLMError", "__version__"]
