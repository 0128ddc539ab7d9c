fn main() {
    println!("twill CNI plugin {}", env!("CARGO_PKG_VERSION"));
}
