"""signalrl: LLM post-training where every method is a choice of training signal."""

__version__ = "0.1.0"
