"""What a run stands on: loading workers, devices, streaming, the deadline, memory."""
