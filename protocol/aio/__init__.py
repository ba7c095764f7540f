"""Asyncio glue shared by both ends: drives a multiplexer over an asyncssh channel."""
