"""Re-run the two studies' experiments at an affordable scale and say which claims hold."""
