"""The network every objective shares: towers, fusion, decoder, token merging."""
