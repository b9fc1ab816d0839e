"""Small pieces the data flow uses: byte-bounded caches, image decoding, A1111 infotext, sampler names."""
