"""Small pieces the data flow uses: devices and budgets, caches, image decoding, A1111 infotext, samplers."""
