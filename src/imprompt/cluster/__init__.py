"""Several replicas on Ray Serve (`imprompt serve --workers N`, the `cluster` extra): the same app, with each
request routed to the replicas that already hold its models. Nothing here is imported without Ray."""
