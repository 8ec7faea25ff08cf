"""cqr-lightning: train conversational query rewriters with the ConvSearch-R1 recipe."""

__version__ = "0.1.0"
