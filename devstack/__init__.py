"""Local stand-ins and process management for running and testing the system on one machine."""
