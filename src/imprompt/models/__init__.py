"""What is on disk: files and folders -> specs, read from their tensors.

`store` indexes the models folders and resolves names, `probe` turns a file into a spec (`specs`), `catalog`
knows the field's published names, `single_file` the A1111 checkpoints, `download` fetches published adapters.
"""
