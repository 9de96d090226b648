"""The word lists of the ``wonderwords`` package (3.0.1, MIT licence,
https://github.com/mrmaxguns/wonderwordsmodule), for machines without it installed (the GPU
training machine has no package index). `evaluation.words` reads only
``wonderwords/assets/{noun,adjective,verb}list.txt``; ``scripts/gpu_train_quality_model.sh``
puts this folder on ``PYTHONPATH`` only when ``import wonderwords`` fails."""
