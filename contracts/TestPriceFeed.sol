// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title TestPriceFeed
/// @notice Chainlink's AggregatorV3Interface for tests and local chains, with setters for
///         every field a consumer checks: the answer, the round ids, `startedAt` and
///         `updatedAt`. It serves as a price feed (ETH/USD, EUR/USD) and, with answers 0 (up)
///         and 1 (down), as an L2 sequencer-uptime feed. Anyone may set it (tests only).
contract TestPriceFeed {
    uint8 public immutable decimals;
    string public description;
    uint256 public constant version = 4;

    uint80 private _roundId;
    int256 private _answer;
    uint256 private _startedAt;
    uint256 private _updatedAt;
    uint80 private _answeredInRound;

    event RoundSet(uint80 indexed roundId, int256 answer, uint256 startedAt, uint256 updatedAt, uint80 answeredInRound);

    error NoSuchRound(uint80 roundId);

    constructor(uint8 decimals_, string memory description_, int256 answer) {
        decimals = decimals_;
        description = description_;
        setAnswer(answer);
    }

    /// @notice A new complete round with `answer`, started and updated in this block.
    function setAnswer(int256 answer) public {
        _set(_roundId + 1, answer, block.timestamp, block.timestamp, _roundId + 1);
    }

    /// @notice Every field of the latest round as given: a stale `updatedAt`, an incomplete
    ///         round (`answeredInRound < roundId`), a zero or negative answer.
    function setRound(
        uint80 roundId,
        int256 answer,
        uint256 startedAt,
        uint256 updatedAt,
        uint80 answeredInRound
    ) external {
        _set(roundId, answer, startedAt, updatedAt, answeredInRound);
    }

    /// @notice Only the latest round's `updatedAt` (and `startedAt`), e.g. to age the answer.
    function setUpdatedAt(uint256 updatedAt) external {
        _set(_roundId, _answer, updatedAt, updatedAt, _answeredInRound);
    }

    function latestRoundData()
        external
        view
        returns (uint80 roundId, int256 answer, uint256 startedAt, uint256 updatedAt, uint80 answeredInRound)
    {
        return (_roundId, _answer, _startedAt, _updatedAt, _answeredInRound);
    }

    /// @notice Only the latest round is kept: older ones revert, as a pruned aggregator's do.
    function getRoundData(uint80 roundId)
        external
        view
        returns (uint80, int256, uint256, uint256, uint80)
    {
        if (roundId != _roundId) revert NoSuchRound(roundId);
        return (_roundId, _answer, _startedAt, _updatedAt, _answeredInRound);
    }

    function _set(uint80 roundId, int256 answer, uint256 startedAt, uint256 updatedAt, uint80 answeredInRound)
        private
    {
        _roundId = roundId;
        _answer = answer;
        _startedAt = startedAt;
        _updatedAt = updatedAt;
        _answeredInRound = answeredInRound;
        emit RoundSet(roundId, answer, startedAt, updatedAt, answeredInRound);
    }
}
