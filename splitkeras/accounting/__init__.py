"""Resource accounting: client FLOPs and bytes per client for each method."""
