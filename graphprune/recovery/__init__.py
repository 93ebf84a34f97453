"""Accuracy recovery before fine-tuning: least-squares compensation and statistics repair."""
