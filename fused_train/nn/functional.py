"""Fused functional losses (see fused_train.nn.CrossEntropyLoss)."""
