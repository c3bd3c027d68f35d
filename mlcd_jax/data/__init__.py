"""Images in: sources (folder, ArrayRecord, tfds, the bundled digits), decode and crops, the grain
pipeline, convert + its index of keys, regions (boxes, texts) from COCO / SA-1B / JSON lines,
record keys, the tokenizer."""
