"""Several replicas on Ray Serve (`imprompt serve --workers N`): each request goes to the replica holding its models.

The same app as the single-process server, with the `cluster` extra; nothing here is imported without Ray."""
