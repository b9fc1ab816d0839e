"""`imprompt demo` and `imprompt pack`: the demo model pack and the article's switching scenario."""
