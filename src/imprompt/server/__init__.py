"""imprompt's HTTP server: A1111 / SD.Next-compatible API, native API, job queue and web page."""
