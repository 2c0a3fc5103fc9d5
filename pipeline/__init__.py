"""Ray stages: preprocess (Ray Data), train (Ray Train), serve (Ray Serve), job submission, the s2 command."""
