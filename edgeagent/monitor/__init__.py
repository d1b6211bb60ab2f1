"""Board monitoring (psutil, Pi and Jetson extras) and the context that gates updates."""
