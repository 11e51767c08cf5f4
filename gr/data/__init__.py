"""Text-video data: mp4 I/O, the webdataset clip stream, and the LightningDataModule."""
