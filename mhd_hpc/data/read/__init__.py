"""Run-time reading: batch streams over built shards (numpy, PIL/WebDataset, DALI), behind one
factory. Readers never write into the dataset folder."""
