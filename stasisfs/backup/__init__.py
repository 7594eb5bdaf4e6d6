"""The backup pipeline: walking the source, worker processes, turning files into sealed chunks and trees."""
