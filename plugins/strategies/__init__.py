"""Strategy plugins: ways to train one model across the processes of a torch.distributed job."""
