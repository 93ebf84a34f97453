"""torch frontend: torch.export / torch.fx traces as channel graphs."""
