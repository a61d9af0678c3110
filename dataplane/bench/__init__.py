"""`dataplane bench`: RFC 2544 against the lab's device under test (docs/lab.md)."""
