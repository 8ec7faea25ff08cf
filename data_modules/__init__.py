"""LightningDataModules that stream conversation turns."""

from data_modules.conversations import ConversationDataModule, TurnBatch, TurnStream
from data_modules.distilled import DistilledDataModule

__all__ = ["ConversationDataModule", "DistilledDataModule", "TurnBatch", "TurnStream"]
