"""LightningDataModules that stream conversation turns."""

from data_modules.conversations import ConversationDataModule, TurnBatch, TurnStream

__all__ = ["ConversationDataModule", "TurnBatch", "TurnStream"]
