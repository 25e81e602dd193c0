"""Training tools shared by every trainer of the toolkit (pretraining, MIL top-k fine-tuning,
patch fine-tuning, segmentation): tile augmentation pipelines (:mod:`featstore.train.augment`)
and the threaded tile reader over a store's coords (:mod:`featstore.train.feed`)."""
