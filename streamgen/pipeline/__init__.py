"""The live pipeline: frames, stages, policies, the asyncio runner and timing."""
