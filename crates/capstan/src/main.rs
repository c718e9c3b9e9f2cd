fn main() {
    std::process::exit(capstan::cli::main());
}
