//! Prints the parse error of each argument: `cargo run -p capstan-promql --example parse_errors -- 'sum(x'`
fn main() {
    for q in std::env::args().skip(1) {
        println!("{q:?} => {:?}", capstan_promql::parse(&q).err());
    }
}
