"""What the verbs do with images, above the drivers: create, check,
resize and rebase (dispatched to the format that has them), convert,
compare, and info/map as qemu-img renders them."""
