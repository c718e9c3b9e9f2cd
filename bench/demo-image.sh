# Sourced by the container benchmarks: `demo_image WORKDIR [CHANGE ...]` imports
# the release demo binary and the libraries it links as `capstan-demo:bench`
# (FROM scratch, no registry), with `docker import -c` CHANGEs added to its
# entrypoint and `HOST=0.0.0.0`.
demo_image() {
  local work=$1; shift
  local changes=(-c 'ENTRYPOINT ["/capstan-demo"]' -c 'ENV HOST=0.0.0.0')
  for c in "$@"; do changes+=(-c "$c"); done
  mkdir -p "$work/rootfs"
  cp target/release/capstan-demo "$work/rootfs/"
  for lib in $(ldd target/release/capstan-demo | grep -o '/[^ ]*'); do
    mkdir -p "$work/rootfs$(dirname "$lib")"; cp -L "$lib" "$work/rootfs$lib"
  done
  tar -C "$work/rootfs" -c . | docker import "${changes[@]}" - capstan-demo:bench >/dev/null
}
