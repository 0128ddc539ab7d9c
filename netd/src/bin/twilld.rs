fn main() {
    println!("twilld {}", env!("CARGO_PKG_VERSION"));
}
