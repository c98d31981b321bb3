"""Speed and memory of prefnb against TRL on identical work (`python -m benchmarks`)."""
